"""One module per page of the sidebar, in the order a user goes through them."""
