from lowrank_runner.cli import main

main()
