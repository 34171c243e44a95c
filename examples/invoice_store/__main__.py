from examples.invoice_store.cli import main

main()
