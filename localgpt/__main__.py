from localgpt.cli import main

main()
