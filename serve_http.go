package graceful

import (
	"cmp"
	"context"
	"errors"
	"net"
	"net/http"
	"time"
)

// Serve registers srv to serve HTTP on ln when [Process.Run] starts, and to
// be drained when the process drains. It sets hooks on srv (BaseContext,
// ConnState, Handler), keeping the caller's own; call it before srv starts
// and do not start srv yourself. For HTTPS set srv.TLSConfig (with its
// certificates) and pass the plain listener: Serve then serves TLS on it,
// HTTP/2 included. Do not wrap ln in [crypto/tls.NewListener] yourself, or the
// connections cannot be tracked under TLS.
//
// The drain, bounded by [Options.DrainTimeout]:
//  1. ln stops accepting (in an upgrade the successor keeps accepting on the
//     same socket) and requests see [Process.Draining] closed;
//  2. every HTTP/1 response now carries "Connection: close"; a keep-alive
//     connection that goes idle may carry one more request for
//     [Options.IdleGrace], and one that stays idle through it is retired
//     with a FIN (after a TLS close_notify) and a short read-drain, never a
//     reset and never while a request is arriving; a request that has
//     begun to arrive gets srv.ReadHeaderTimeout (else srv.ReadTimeout,
//     else IdleGrace) to arrive, then its connection is retired the same
//     way, so that a stalled client cannot hold the drain;
//  3. once no response can offer keep-alive any more, HTTP/2 connections
//     get GOAWAY and in-flight requests finish ([http.Server.Shutdown]);
//  4. hijacked connections (WebSocket, ...) are waited for;
//  5. at the deadline whatever is left is force-closed, hijacked connections
//     included, like [http.Server.Close].
//
// When the drain follows a successful upgrade, step 2 differs for plain
// (non-TLS) HTTP/1 connections unless [Options.NoHandOff] is set: they are
// not closed but handed to the new process, each the moment it is idle, with
// any bytes the client has already sent still unread in the socket. The
// client keeps its connection and never notices. A request that arrives as
// the connection is being claimed is served here first.
func (p *Process) Serve(srv *http.Server, ln net.Listener) {
	t := newTracker(ln.Addr().String())
	p.addTracker(t)
	p.tickets.install(srv.TLSConfig) // sessions resume across upgrades
	s := &httpServer{p: p, srv: srv, ln: &trackedListener{Listener: ln, t: t}, t: t, tls: srv.TLSConfig != nil}
	s.goaway, s.goawaySent = context.WithCancel(context.Background())
	// HTTP/2 connections get GOAWAY from Shutdown; streams on them are told
	// goodbye only then (see Goodbye).
	srv.RegisterOnShutdown(s.goawaySent)
	connContext := srv.ConnContext
	srv.ConnContext = func(ctx context.Context, c net.Conn) context.Context {
		if connContext != nil {
			ctx = connContext(ctx, c)
		}
		tc, _ := unwrap(c)
		return context.WithValue(ctx, connKey{}, &servedConn{c: tc, s: s})
	}

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
		t.setHTTPState(c, st)
		if connState != nil {
			connState(c, st)
		}
	}
	next := srv.Handler
	if next == nil {
		next = http.DefaultServeMux
	}
	if p.stats != nil {
		next = p.stats.handler(next) // a probation judges what it served
	}
	srv.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ProtoMajor == 1 && p.life.get().drainStarted() && (r.TLS != nil || p.handOffTarget() == nil) {
			// The client closes the connection after this response instead
			// of reusing it: no race with a close from our side. (A plain
			// connection that can be handed to the successor stays open: it
			// is passed on when it next goes idle.)
			w.Header().Set("Connection", "close")
		}
		next.ServeHTTP(w, r)
	})
	p.addListener(ln, s.ln)
	if !s.tls || p.canary != nil || p.takesBack() {
		// Connections the parent hands over (or a canary hands back) are
		// served as if accepted here. Under TLS only new connections come
		// (before their handshake): to a canary, or back from one that
		// never read them.
		s.inbox, s.inboxLn = p.registerInbox(ln, t)
	}
	p.Add(s.run, s.stop)
}

type httpServer struct {
	p       *Process
	srv     *http.Server
	ln      *trackedListener
	t       *tracker
	inbox   *inbox           // connections handed over by the parent
	inboxLn *trackedListener // inbox, tracked
	tls     bool             // decided at Serve: net/http may set TLSConfig itself later (HTTP/2)

	// goaway is done once Shutdown (or Close) began: HTTP/2 connections
	// have been sent GOAWAY, or are being closed. goawaySent ends it.
	goaway     context.Context
	goawaySent context.CancelFunc
}

// connKey is the context key of the servedConn a request arrived on.
type connKey struct{}

// servedConn is the connection a request arrived on, and its server.
type servedConn struct {
	c *trackedConn
	s *httpServer
}

// goodbyeGate returns, for a request on an HTTP/2 connection of a Serve
// server, a context done once that connection has been sent GOAWAY;
// otherwise nil. A stream told goodbye before its client has the GOAWAY
// would open its next stream on the same connection, to this draining
// process, and be told goodbye again, over and over.
func goodbyeGate(ctx context.Context) context.Context {
	sc, _ := ctx.Value(connKey{}).(*servedConn)
	if sc == nil || sc.c == nil || !sc.c.h2.Load() {
		return nil
	}
	return sc.s.goaway
}

func (s *httpServer) run() error {
	if s.inbox != nil {
		received := make(chan struct{})
		go func() {
			defer close(received)
			defer close(s.inbox.stopped)
			if s.tls {
				s.srv.ServeTLS(s.inboxLn, "", "") // ends once the inbox is finished
			} else {
				s.srv.Serve(s.inboxLn)
			}
		}()
		defer func() {
			<-received
			// Connections the parent handed over late, during our own
			// drain, are still being passed on: wait for them, until the
			// drain's deadline.
			if ctx := s.p.drainContext(); ctx != nil && s.t.waitEmpty(ctx) != nil {
				s.t.closeAll()
			}
		}()
	}
	var err error
	if s.tls {
		// net/http wraps our listener in TLS itself, so it sees *tls.Conn
		// (ALPN, HTTP/2) and we still track the TCP connection under it.
		err = s.srv.ServeTLS(s.ln, "", "")
	} else {
		err = s.srv.Serve(s.ln)
	}
	if errors.Is(err, http.ErrServerClosed) || (s.ln.closed.Load() && errors.Is(err, net.ErrClosed)) {
		return nil
	}
	return err
}

func (s *httpServer) stop(ctx context.Context) error {
	log := s.p.log
	s.ln.Close()
	if to := s.p.handOffTarget(); to != nil {
		key := s.t.key
		s.t.selective.Store(false) // the drain passes on every idle connection
		s.t.setSend(func(c net.Conn) error { return to.send(key, c) })
		defer func() {
			if kept := s.t.kept.Load(); kept > 0 {
				log.Warn("idle connections not handed to the "+s.p.otherProcess()+": closed instead", "addr", key, "handed", s.t.handed.Load(), "not_handed", kept)
			} else {
				log.Info("idle connections handed to the "+s.p.otherProcess(), "addr", key, "handed", s.t.handed.Load())
			}
		}()
	}
	s.t.startDrain()
	defer func() {
		if n := s.t.expired.Load(); n > 0 {
			log.Warn("drain: connections whose request did not arrive in time closed", "addr", s.t.key, "conns", n)
		}
	}()
	if s.inbox != nil {
		// Connections our parent still hands over must be in the tracker
		// before Shutdown, which would answer them "Connection: close".
		select {
		case <-s.inbox.done:
		case <-ctx.Done():
		}
	}
	err := s.retireKeepAlive(ctx)
	if err == nil {
		// Every HTTP/1 connection now ends after its current response;
		// HTTP/2 connections get GOAWAY and finish their streams.
		err = s.srv.Shutdown(ctx)
	}
	if err == nil {
		// Shutdown does not wait for hijacked connections; their handlers
		// got Draining() and have until the deadline to say goodbye.
		err = s.t.waitEmpty(ctx)
	}
	if err != nil {
		// The deadline: what is left is closed, hijacked connections too.
		s.goawaySent()  // Close runs no shutdown hooks
		n := s.t.live() // Close closes most of them, closeAll the hijacked ones
		s.srv.Close()
		s.t.closeAll()
		s.t.forced.Add(int64(n))
		if n > 0 {
			log.Warn("drain deadline: connections force-closed", "addr", s.t.key, "conns", n)
		}
	}
	return nil
}

// drainAction is what the keep-alive retirement does with a connection now.
type drainAction int

const (
	drainSkip   drainAction = iota // nothing to wait for: HTTP/2, retired, passed on
	drainWait                      // wait for its next state change
	drainClaim                     // claim it for the successor
	drainRetire                    // retire it at the returned time (now if past)
	drainExpire                    // its request has not arrived: expire it at the returned time (now if past)
)

// connView is what decideDrain needs to know of a connection.
type connView struct {
	state    connState
	http     http.ConnState
	h2       bool
	tls      bool
	preDrain bool
	since    time.Time // accepted, or last went idle
	seenAt   time.Time // during the drain: when the request arriving began (zero: before the drain)
}

// decideDrain is the per-connection rule of retireKeepAlive, a pure function
// of the connection's state: handoff says whether idle plain connections go
// to a successor; grace is IdleGrace, and arrival bounds how long a request
// that has begun to arrive may take to reach net/http.
func decideDrain(c connView, handoff bool, drainStart time.Time, grace, arrival time.Duration) (drainAction, time.Time) {
	switch {
	case c.h2, c.state == connRetired, c.state == connDone, c.state == connHanding, c.state == connHanded:
		return drainSkip, time.Time{}
	case c.state == connClaimed:
		// Passed on once net/http closes it, unless a request beats the
		// claim: then it must be served before Shutdown.
		return drainWait, time.Time{}
	}
	// With a successor, a plain connection stays open (no "Connection:
	// close") until it is passed on at its next idle moment; Shutdown,
	// which closes connections after their response, must wait until every
	// one is.
	plainHandoff := handoff && !c.tls
	switch c.http {
	case http.StateActive:
		if c.preDrain || plainHandoff {
			return drainWait, time.Time{}
		}
	case http.StateIdle, http.StateNew:
		if c.state != connFresh {
			// A request is arriving; without a successor it gets
			// "Connection: close". Wait until net/http sees it
			// (StateActive): Shutdown would close the still idle-looking
			// connection under it, and net/http drops a request it reads
			// once Shutdown has begun, even on a new connection. But not
			// for longer than arrival: a client that sent part of a request
			// and stalled must not hold the drain to its deadline.
			began := c.seenAt
			if began.Before(drainStart) {
				began = drainStart
			}
			return drainExpire, began.Add(arrival)
		}
		if plainHandoff {
			return drainClaim, time.Time{}
		}
		at := c.since
		if at.Before(drainStart) {
			at = drainStart
		}
		return drainRetire, at.Add(grace)
	}
	return drainSkip, time.Time{}
}

// retireKeepAlive ends HTTP/1 keep-alive without the race of
// [http.Server.Shutdown], which closes idle connections at once while a
// client may be writing its next request on them, and closes those that
// just sent a keep-alive response. Instead, an idle connection may carry
// one more request (answered with "Connection: close") for IdleGrace after
// it went idle or the drain started; one that stays idle through it is
// retired: FIN, then a short read-drain. With a successor, idle plain
// connections are claimed and passed on instead. It returns once no
// connection can still get a keep-alive response, so Shutdown closes
// nothing a client may reuse.
func (s *httpServer) retireKeepAlive(ctx context.Context) error {
	grace := s.p.opts.IdleGrace
	// How long a request that has begun to arrive may take: what net/http
	// itself allows for headers, else IdleGrace.
	arrival := cmp.Or(max(s.srv.ReadHeaderTimeout, 0), max(s.srv.ReadTimeout, 0), grace)
	timer := time.NewTimer(grace)
	defer timer.Stop()
	for {
		s.t.mu.Lock()
		changed := s.t.changedLocked()
		now := time.Now()
		handoff := s.t.send.Load() != nil
		var due, stalled []*trackedConn
		var next time.Time
		later := func(at time.Time) {
			if next.IsZero() || at.Before(next) {
				next = at
			}
		}
		for c := range s.t.conns {
			v := connView{state: c.state(), http: c.http, h2: c.h2.Load(), tls: c.tls != nil, preDrain: c.preDrain, since: c.since}
			if ns := c.seenAt.Load(); ns != 0 {
				v.seenAt = time.Unix(0, ns)
			}
			action, at := decideDrain(v, handoff, s.t.drainStart, grace, arrival)
			switch action {
			case drainWait:
				later(now.Add(grace))
			case drainClaim:
				// net/http closes it at once, passing it on; if bytes got
				// there first, wait for the request.
				c.claimLocked()
				later(now.Add(grace))
			case drainRetire:
				if at.After(now) {
					later(at)
				} else {
					due = append(due, c)
				}
			case drainExpire:
				if at.After(now) {
					later(at)
				} else {
					stalled = append(stalled, c)
				}
			}
		}
		s.t.mu.Unlock()
		for _, c := range due {
			c.retire()
		}
		expired := 0
		if len(stalled) > 0 {
			s.t.mu.Lock()
			for _, c := range stalled {
				if c.expireLocked() {
					expired++
				}
			}
			s.t.mu.Unlock()
			s.t.expired.Add(int64(expired))
			if expired < len(stalled) {
				// Its request is complete, or being read: net/http reports
				// it active in a moment. Look again then.
				later(now.Add(rescanInterval))
			}
		}
		if len(due) > 0 || expired > 0 {
			continue
		}
		if s.inbox != nil && s.inbox.pending() {
			later(now.Add(time.Millisecond)) // handed over, not yet accepted
		}
		if next.IsZero() {
			return nil
		}
		timer.Reset(time.Until(next))
		select {
		case <-changed:
			// Thousands of connections change state at once when they are
			// claimed: look again at most every rescanInterval, not at
			// every change (each look is O(connections)).
			if wait := rescanInterval - time.Since(now); wait > 0 {
				timer.Reset(wait)
				select {
				case <-timer.C:
				case <-ctx.Done():
					return ctx.Err()
				}
			}
		case <-timer.C:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// rescanInterval is the shortest time between two looks of retireKeepAlive
// at every connection.
const rescanInterval = time.Millisecond
