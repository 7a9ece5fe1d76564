"""Self-contained Hugging Face code for exported students (``metakd_ray.export``).

``modeling_metakd.py`` is *copied* into every export folder and imported from there by ``transformers``
(``trust_remote_code=True``), so it imports only ``torch`` and ``transformers`` — never ``metakd_ray``.
"""
