"""The demo page (Streamlit) and the HTTP client it uses."""
