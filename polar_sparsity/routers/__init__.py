"""Router training and the router bundle.

``nets`` (the router modules) and ``bundle`` (export / ``load_routers``) import neither Hydra nor
Lightning: the evaluation patches and the fast decoder load routers through them. Training lives in
``data`` (store-backed DataModule), ``module`` (LightningModule), ``metrics``, ``task`` and ``summary``.
"""
