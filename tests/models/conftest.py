from tests.model_fixtures import trained_model  # noqa: F401  (session fixture)
