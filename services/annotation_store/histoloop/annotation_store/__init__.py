"""histoloop annotation-store service.

The system of record for what pathologists said: projects and their class schema,
datasets and their spots, annotators, every label ever given (append-only), consensus
and agreement over several annotators, query sets and rounds, Loupe Browser CSV in and
out, and ``labels.committed`` through a transactional outbox. The scaffold runs it via
:func:`histoloop.annotation_store.service.build`; see ``README.md`` beside this file.
"""

__all__: list[str] = []
