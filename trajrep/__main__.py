from trajrep.cli import main

main()
