from lmscli.cli.app import main

main()
