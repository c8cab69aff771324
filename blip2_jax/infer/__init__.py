"""`blip2-jax infer`: captions, answers and features for whole data sets, written shard by shard."""
