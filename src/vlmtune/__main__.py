from vlmtune.cli import main

main()
