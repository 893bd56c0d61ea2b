"""Parity nets on test cases nobody here wrote: PyTorch's OpInfo database (``test_opinfo``), a fuzzer of the
Fusion region planner (``test_fuzz``, ``python -m tests.parity.fuzz``), the repros of the bugs they found
(``test_regressions``, ``bugs``)."""
