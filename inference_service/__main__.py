from rlhf.runtime.environment import prepare_environment

prepare_environment()  # before anything imports torch

from inference_service.app import main  # noqa: E402

main()
