"""Reading a sealed cache during training: `FeatureCache` (checked row reads, local or remote), `FeatureDataset`,
`MixedFeatureDataset` (several caches as one training set), `BucketBatchSampler` (one bucket per batch, exactly
split across ranks) and `collate_features`. Depends on the cache format only.
"""
