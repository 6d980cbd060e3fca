package graceful

import (
	"context"
	"errors"
	"net"
	"net/http"
)

// Serve registers srv to serve HTTP on ln when [Process.Run] starts, and to
// be drained when the process drains. It sets hooks on srv (BaseContext,
// ConnState, Handler), keeping the caller's own; call it before srv starts
// and do not start srv yourself.
//
// The drain, bounded by [Options.DrainTimeout]:
//  1. ln stops accepting (in an upgrade the successor keeps accepting on the
//     same socket) and requests see [Process.Draining] closed;
//  2. every response now carries "Connection: close", and idle keep-alive
//     connections may carry one more request for [Options.IdleGrace];
//  3. the connections still idle are closed and in-flight requests finish
//     ([http.Server.Shutdown]);
//  4. hijacked connections (WebSocket, SSE via hijack, ...) are waited for;
//  5. at the deadline whatever is left is force-closed, hijacked connections
//     included, like [http.Server.Close].
func (p *Process) Serve(srv *http.Server, ln net.Listener) {
	t := newTracker()
	s := &httpServer{p: p, srv: srv, ln: &trackedListener{Listener: ln, t: t}, t: t}

	base := srv.BaseContext
	srv.BaseContext = func(l net.Listener) context.Context {
		ctx := context.Background()
		if base != nil {
			ctx = base(l)
		}
		return context.WithValue(ctx, ctxKey{}, p)
	}
	connState := srv.ConnState
	srv.ConnState = func(c net.Conn, st http.ConnState) {
		t.setState(c, st)
		if connState != nil {
			connState(c, st)
		}
	}
	next := srv.Handler
	if next == nil {
		next = http.DefaultServeMux
	}
	srv.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ProtoMajor == 1 && p.isDraining() {
			// The client closes the connection after this response instead
			// of reusing it: no race with a close from our side.
			w.Header().Set("Connection", "close")
		}
		next.ServeHTTP(w, r)
	})
	p.Add(s.run, s.stop)
}

type httpServer struct {
	p   *Process
	srv *http.Server
	ln  *trackedListener
	t   *tracker
}

func (s *httpServer) run() error {
	err := s.srv.Serve(s.ln)
	if errors.Is(err, http.ErrServerClosed) || (s.p.isDraining() && errors.Is(err, net.ErrClosed)) {
		return nil
	}
	return err
}

func (s *httpServer) stop(ctx context.Context) error {
	log := s.p.log
	s.ln.Close()

	graceCtx, cancel := context.WithTimeout(ctx, s.p.opts.IdleGrace)
	idle := func() bool { return s.t.count(http.StateIdle, http.StateNew) == 0 }
	err := s.t.waitUntil(graceCtx, idle)
	cancel()
	if err != nil {
		log.Debug("idle grace over", "idle", s.t.count(http.StateIdle, http.StateNew))
	}

	if err := s.srv.Shutdown(ctx); err != nil {
		n := s.t.count()
		s.srv.Close()
		s.t.closeAll()
		log.Warn("drain deadline: connections force-closed", "conns", n)
		return nil
	}
	// Shutdown does not wait for hijacked connections; their handlers got
	// Draining() and have until the deadline to say goodbye.
	if err := s.t.waitUntil(ctx, func() bool { return s.t.count() == 0 }); err != nil {
		n := s.t.closeAll()
		log.Warn("drain deadline: hijacked connections force-closed", "conns", n)
	}
	return nil
}
