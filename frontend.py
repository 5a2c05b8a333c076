"""`streamlit run frontend.py`: the page to try a policy (see policy_server/ui.py)."""

from policy_server.ui import main

main()
