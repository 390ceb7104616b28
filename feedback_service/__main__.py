from rlhf.runtime.environment import prepare_environment

prepare_environment()  # before anything imports torch

from feedback_service.app import main  # noqa: E402

main()
