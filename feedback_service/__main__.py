"""`python -m feedback_service` runs the feedback gRPC server."""

from feedback_service.app import main

if __name__ == "__main__":
    main()
