"""The life cycle after training: the store, the registry, the server's store sink, feedback import.

store.py     SQLAlchemy Core tables (models, versions, aliases, alias_history, predictions, feedback)
             on `<runs_dir>/largo.db` (SQLite, WAL) or `LARGO_DB_URL` (e.g. PostgreSQL)
registry.py  register a bundle as name@N (file hashes: registered bundles are immutable), aliases,
             promote / rollback, resolve `name`, `name@N`, `name@alias` → bundle folder
sink.py      StoreSink: `create_app(predictor, sink=StoreSink(store, name, version))`
feedback.py  `largo feedback import`: corrections by prediction id, or new labelled rows
serving.py   `largo serve NAME`: serve a registered version, log to the store, hot-swap on promote/rollback
update.py    `largo update`: fine-tune or retrain on the data plus feedback, gate, register, promote
monitor.py   `largo monitor`: input drift (PSI), predictions, confidence, feedback accuracy, latency
api.py       the functions the `largo registry …` and `largo feedback …` commands call

Torch-free but for update.py (it trains): a serving image can log to the store without torch.
"""
