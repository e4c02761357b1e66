"""Customer-facing services: instant quotes (:mod:`~forgeline.quotes.pricing`, STL geometry in
:mod:`~forgeline.quotes.stl`) and real-time order tracking (:mod:`~forgeline.quotes.tracking`), served
on the customer topic level by :mod:`~forgeline.quotes.service`; ``forgeline quote`` in
:mod:`~forgeline.quotes.cli`. See ``docs/quotes.md``.
"""
