"""The API's routes, a router per concern, each built over the app's ``ApiState``."""
