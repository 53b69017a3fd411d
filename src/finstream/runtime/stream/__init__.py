"""The stream engine's parts; :mod:`finstream.runtime.engine` composes them into ``StreamEngine``.

- :mod:`.events`: what a role sees (``Event``, ``Output``, ``Processor``) and the options;
- :mod:`.base`: the engine's metrics and the state its parts share;
- :mod:`.decoding`: decoding at the edge (each record once, by its topic's contract);
- :mod:`.commits`: producing, transactions and offset commits, and going back to the last commit;
- :mod:`.restore`: state restore from changelog topics;
- :mod:`.probe`: readiness and the background Kafka probe (lag, stalls).
"""
