from nodewatch.cli import main

main()
