"""pwff's common library: specs, messages, codecs, bus and store, models and data.

Nothing here imports from `services`: the services meet only on the bus and in the store.
"""
