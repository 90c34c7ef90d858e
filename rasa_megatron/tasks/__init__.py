"""Small generated tasks used by the default job and the tests."""
