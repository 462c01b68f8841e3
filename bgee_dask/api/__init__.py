"""Layer 6, api: ``Atlas``, ``Query`` and ``convert``, composed from the layers below (query is layer 5)."""
