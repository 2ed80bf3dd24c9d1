"""How ``pyrovae train MODEL`` builds, feeds, evaluates and draws each model:
one recipe per model for the shared loop in :mod:`pyrovae.train`."""
