from nodewatch.cli.commands import main

main()
