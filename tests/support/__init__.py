"""Helpers shared by the unit, integration and end-to-end tests (importable
as tests.support.<module>; pytest.ini puts the repository on sys.path)."""
