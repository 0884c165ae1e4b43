from ztna.cli import main

main()
