"""RQ job entry points: thin functions that take ids and call domain services.

Jobs run inside the worker's application context (``whistle worker`` creates the app once
before forking), so they use ``db.session`` and ``get_redis()`` like any service caller.
"""
