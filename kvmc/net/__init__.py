"""kvmc networks: containers on one network reach each other by name (docker's user-defined
networks). ``plan`` holds the pure rules (subnets, addresses, names, the DNS hosts file),
``store`` the registry of networks, ``host`` what is done on the host (a namespace, a bridge
and a DNS server per network in use; taps). kvmc/vmlife.py joins and leaves networks as VMs
start and end; kvmc/service/networks.py holds the rules that involve containers."""
