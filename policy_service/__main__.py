from policy_service.app import main

main()
