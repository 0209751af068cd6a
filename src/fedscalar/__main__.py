from fedscalar.cli import main

main()
