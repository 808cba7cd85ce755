"""GSM8K-format data for d2f: the testbed generator (`gsm`), answer extraction (`extract`), evaluation-set
loaders (`gsm8k`) and the testbed tokenizer (`tokenizer`). See d2f/data/README.md."""
