from chatkv.cli import main

main()  # ends the process itself
