// Package graceful gives a Go server zero-downtime binary upgrades on a
// single host.
//
// A process built with graceful serves on listeners obtained from
// [Process.Listen]. On SIGHUP (or a call to [Process.Upgrade]) it starts the
// binary found on disk at its own path as a child, hands it every listener,
// and waits for the child to declare itself ready. Only then does the old
// process stop accepting and drain: in-flight requests finish, idle
// keep-alive connections are handed to the new process (the client keeps its
// TCP connection; see [Options.NoHandOff]), HTTP/2 gets GOAWAY, long-lived
// handlers are told through [Process.Goodbye] or [Process.Draining], and
// whatever is left at the drain deadline is closed. A child that exits, hangs
// or fails its checks is killed after [Options.UpgradeTimeout] and the old
// process keeps serving as if nothing had happened.
//
// Without a successor (SIGTERM, as in a Kubernetes rolling update) the drain
// fails readiness first for [Options.DrainDelay], then retires keep-alive
// connections without racing the clients: "Connection: close" on the next
// response, a FIN for those idle through [Options.IdleGrace].
//
// HTTP servers are registered with [Process.Serve], raw TCP or Unix
// protocols with [Process.ServeConns], gRPC with package gracefulgrpc, and
// anything else with [Process.Add]. Under systemd the process speaks the
// notify protocol, and [Options.ControlSocket] with the gracefulctl command
// (or package control) gives a reload whose exit status is the upgrade's
// outcome.
//
// A process goes through the phases of [Phase] (starting, checking,
// serving, upgrading, delaying, handing-over, draining, done) along the
// transitions documented there, and nothing else: [Process.Phase] reports
// where it is.
//
// File descriptor passing is done by github.com/cloudflare/tableflip. On a
// fresh start, sockets passed by systemd socket activation (LISTEN_FDS) are
// adopted by [Process.Listen] and carried across later upgrades.
//
// A minimal main:
//
//	p, err := graceful.New(graceful.Options{DrainTimeout: 30 * time.Second})
//	if err != nil {
//		log.Fatal(err)
//	}
//	ln, err := p.Listen("tcp", ":8080")
//	if err != nil {
//		log.Fatal(err)
//	}
//	mux := http.NewServeMux()
//	mux.Handle("GET /readyz", p.Health().Readiness())
//	p.Serve(&http.Server{Handler: mux}, ln)
//	if err := p.Run(context.Background()); err != nil {
//		log.Fatal(err)
//	}
//
// Inherited file descriptors exist once per process, so [New] may be called
// only once per process.
//
// On platforms other than unix the package builds and serves and drains as
// usual, but [Process.Upgrade] returns [ErrNotSupported].
package graceful
