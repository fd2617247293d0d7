"""Pretraining data (QWEN_SPEC.md section 5): `prep` reads a corpus, normalises it, removes exact and near
duplicates, filters by quality rules, removes benchmark overlap, and tokenises what is left into uint32 shards
with an index.json for the trainer. One module per stage: readers, normalize, dedup, filters, decontam, pack;
config holds the settings and prep runs them."""
