"""The life cycle after training: the store, the registry, the server's store sink, feedback import.

store.py     SQLAlchemy Core tables (models, versions, aliases, alias_history, predictions, feedback)
             on `<runs_dir>/largo.db` (SQLite, WAL) or `LARGO_DB_URL` (e.g. PostgreSQL)
registry.py  register a bundle as name@N (file hashes: registered bundles are immutable), aliases,
             promote / rollback, resolve `name`, `name@N`, `name@alias` → bundle folder
sink.py      StoreSink: `create_app(predictor, sink=StoreSink(store, name, version))`
feedback.py  `largo feedback import`: corrections by prediction id, or new labelled rows
api.py       the functions the `largo registry …` and `largo feedback …` commands call

Torch-free: a serving image can log to the store without torch.
"""
