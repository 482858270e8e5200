"""The ground floor every layer may use: the base error type, reading image files, drawing overlays."""
