"""The ShapesVQA testbed's trainer (``train``, with its ``recipe`` and ``targets``) and the LPM analysis
(``analysis``): they build and study the shipped testbed models; nothing in the installed package needs them at
run time."""
