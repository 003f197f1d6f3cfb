from var_train.cli import console_main

console_main()
