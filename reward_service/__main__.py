from reward_service.app import main

main()
