"""The judge store of the reward plane: ``database`` (the SQLite / PostgreSQL tables: cached judgements, pairwise
verdicts, generated rubrics, patient replies, claims on keys, rate buckets, spend) and ``claims`` (the claim
protocol every paid call goes through, over the store's claim tables)."""
