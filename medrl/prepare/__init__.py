"""``medrl prepare``: the data stage (``stage.run_prepare``), its on-disk record spool, split and gold selection and
the data card. Sits above ``medrl.data`` (records, cleaning, sources), ``medrl.models`` (the tokenizer that counts
tokens) and ``medrl.reward`` (generated rubrics); none of them imports it."""
