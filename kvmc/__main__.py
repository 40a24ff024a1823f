from kvmc.cli import main

main()
