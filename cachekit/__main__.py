from cachekit.cli.main import main

main()
