"""`python -m inference_service` runs the inference server."""

from inference_service.app import main

if __name__ == "__main__":
    main()
