"""The worker role: a DBN replica running the Downpour loop on its data shard."""
