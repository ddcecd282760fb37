"""The conformance checker: adapters, precision profiles, comparison and reports (spec/golden.yaml, spec/tolerance.yaml).

Run it as ``mla-ref check ADAPTER``, as ``pytest --pyargs mla_ref.conformance`` with
``MLA_REF_ADAPTER`` set, or from Python with :func:`mla_ref.conformance.check.check`.
"""
