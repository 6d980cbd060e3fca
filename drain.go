package graceful

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"sync"
	"syscall"
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
//     reset and never while a request is arriving;
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
	t := newTracker()
	t.log = p.log
	s := &httpServer{p: p, srv: srv, ln: &trackedListener{Listener: ln, t: t}, t: t, tls: srv.TLSConfig != nil}

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
		if r.ProtoMajor == 1 && p.isDraining() && (r.TLS != nil || !p.canHandOff()) {
			// The client closes the connection after this response instead
			// of reusing it: no race with a close from our side. (A plain
			// connection that can be handed to the successor stays open: it
			// is passed on when it next goes idle.)
			w.Header().Set("Connection", "close")
		}
		next.ServeHTTP(w, r)
	})
	p.addListener(s.ln)
	if !s.tls && p.hasParent() {
		// Connections the parent hands over are served as if accepted here.
		inj := newInjectListener(ln.Addr())
		p.injectMu.Lock()
		p.injectors[ln.Addr().String()] = inj
		p.injectMu.Unlock()
		s.inject = &trackedListener{Listener: inj, t: t}
		s.injector = inj
	}
	p.Add(s.run, s.stop)
}

type httpServer struct {
	p        *Process
	srv      *http.Server
	ln       *trackedListener
	t        *tracker
	inject   *trackedListener // handed-off connections, in a successor
	injector *injectListener
	tls      bool // decided at Serve: net/http may set TLSConfig itself later (HTTP/2)
}

func (s *httpServer) run() error {
	if s.inject != nil {
		injected := make(chan struct{})
		go func() {
			defer close(injected)
			defer close(s.injector.stopped)
			s.srv.Serve(s.inject) // ends once the parent is gone
		}()
		defer func() {
			<-injected
			// Connections the parent handed over late, during our own
			// drain, are still being passed on: wait for them.
			ctx, cancel := context.WithTimeout(context.Background(), s.p.opts.DrainTimeout)
			defer cancel()
			if s.p.isDraining() && s.t.waitUntil(ctx, func() bool { return s.t.count() == 0 }) != nil {
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

// lingerTimeout bounds the read-drain of a retired connection: how long,
// after our FIN, we wait for the peer to close before closing ourselves.
const lingerTimeout = 500 * time.Millisecond

func (s *httpServer) stop(ctx context.Context) error {
	log := s.p.log
	s.ln.Close()
	if s.p.canHandOff() {
		key := s.ln.Addr().String()
		s.t.mu.Lock()
		s.t.handoff = func(c net.Conn) error { return s.p.handOffConn(key, c) }
		s.t.mu.Unlock()
		defer func() {
			if n := s.t.handed.Load(); n > 0 {
				log.Info("idle connections handed to the new process", "conns", n)
			}
		}()
	}
	s.t.startDrain()
	if s.injector != nil {
		// Connections our parent still hands over must be in the tracker
		// before Shutdown, which would answer them "Connection: close".
		select {
		case <-s.injector.done:
		case <-ctx.Done():
		}
	}
	if err := s.retireKeepAlive(ctx); err != nil {
		n := s.t.count()
		s.srv.Close()
		s.t.closeAll()
		log.Warn("drain deadline: connections force-closed", "conns", n)
		return nil
	}
	// Every HTTP/1 connection now ends after its current response; HTTP/2
	// connections get GOAWAY and finish their streams.
	log.Debug("keep-alive retired; shutting down", "conns", s.t.count())
	if err := s.srv.Shutdown(ctx); err != nil {
		n := s.t.count()
		s.srv.Close()
		s.t.closeAll()
		log.Warn("drain deadline: connections force-closed", "conns", n)
		return nil
	}
	// Shutdown does not wait for hijacked connections; their handlers got
	// Draining() and have until the deadline to say goodbye.
	log.Debug("shut down; waiting for hijacked connections", "conns", s.t.count())
	if err := s.t.waitUntil(ctx, func() bool { return s.t.count() == 0 }); err != nil {
		n := s.t.closeAll()
		log.Warn("drain deadline: hijacked connections force-closed", "conns", n)
	}
	return nil
}

// startDrain marks the connections whose current response may still offer
// keep-alive: their handlers started before the drain, so the response may
// lack "Connection: close".
func (t *tracker) startDrain() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.draining = true
	t.drainStart = time.Now()
	for c := range t.conns {
		c.preDrain = c.state == http.StateActive && !c.h2.Load()
	}
	t.notifyLocked()
}

// retireKeepAlive ends HTTP/1 keep-alive without the race of
// [http.Server.Shutdown], which closes idle connections at once while a
// client may be writing its next request on them, and closes those that
// just sent a keep-alive response. Instead, an idle connection may carry
// one more request (answered with "Connection: close") for IdleGrace after
// it went idle or the drain started; one that stays idle through it is
// retired: FIN, then a short read-drain. It returns once no connection can
// still get a keep-alive response, so Shutdown closes nothing a client may
// reuse.
func (s *httpServer) retireKeepAlive(ctx context.Context) error {
	grace := s.p.opts.IdleGrace
	timer := time.NewTimer(grace)
	defer timer.Stop()
	for {
		s.t.mu.Lock()
		changed := s.t.changedLocked()
		now := time.Now()
		var due []*trackedConn
		var next time.Time
		for c := range s.t.conns {
			if rs := c.rs(); c.h2.Load() || c.lingering.Load() || rs == readHanded {
				continue
			} else if rs == readClaimed {
				// Passed on once net/http closes it, unless a request beats
				// the claim: then it must be served before Shutdown.
				next = now.Add(grace)
				continue
			}
			// With a successor, a plain connection stays open (no
			// "Connection: close") until it is passed on at its next idle
			// moment; Shutdown, which closes connections after their
			// response, must wait until every one is.
			handoff := s.t.handoff != nil && c.tls == nil
			switch c.state {
			case http.StateActive:
				if c.preDrain || handoff {
					next = now.Add(grace) // wait for its state change
				}
			case http.StateIdle, http.StateNew:
				if c.rs() != readNone {
					// A request is arriving; without a successor it gets
					// "Connection: close". Wait until net/http sees it
					// (StateActive), or Shutdown would close the still
					// idle-looking connection under it.
					if c.state == http.StateIdle || handoff {
						next = now.Add(grace)
					}
					continue
				}
				if s.t.handoff != nil && c.claimLocked() {
					next = now.Add(grace) // net/http closes it at once, passing it on
					continue
				}
				at := c.since
				if at.Before(s.t.drainStart) {
					at = s.t.drainStart
				}
				at = at.Add(grace)
				if !at.After(now) {
					due = append(due, c)
				} else if next.IsZero() || at.Before(next) {
					next = at
				}
			}
		}
		s.t.mu.Unlock()
		for _, c := range due {
			c.retire()
		}
		if len(due) > 0 {
			continue
		}
		if s.injector != nil && len(s.injector.c) > 0 {
			next = now.Add(time.Millisecond) // handed over, not yet accepted
		}
		if next.IsZero() {
			return nil
		}
		timer.Reset(time.Until(next))
		select {
		case <-changed:
		case <-timer.C:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// claimLocked claims an idle plain HTTP/1 connection for the successor:
// nothing may have been read since it went idle, and a read in progress is
// woken by a deadline in the past. net/http then sees EOF and closes it,
// and Close passes it on. Called with t.mu held.
func (c *trackedConn) claimLocked() bool {
	if c.tls != nil || c.h2.Load() || (c.state != http.StateIdle && c.state != http.StateNew) {
		return false
	}
	if !c.transition(readNone, readClaimed) {
		return false
	}
	c.Conn.SetReadDeadline(time.Unix(1, 0))
	return true
}

// handOff passes a claimed connection to the successor. If that fails the
// connection is retired instead: FIN and read-drain, as without successor.
func (c *trackedConn) handOff() {
	c.t.mu.Lock()
	send := c.t.handoff
	c.t.mu.Unlock()
	if send != nil && send(c.Conn) == nil {
		c.t.handed.Add(1)
		return
	}
	c.transition(readHanded, readRetired)
	c.lingering.Store(true)
	c.CloseWrite()
	c.Conn.SetReadDeadline(time.Now().Add(lingerTimeout))
	time.AfterFunc(lingerTimeout, func() { c.closeNow() })
}

// retire says goodbye to an idle HTTP/1 connection: TLS close_notify, FIN,
// then a read-drain that discards anything the peer still sends, so no
// request starts and the close sends no RST. It does nothing, and returns
// false, if bytes of a request arrived first.
func (c *trackedConn) retire() bool {
	if !c.transition(readNone, readRetired) {
		return false
	}
	c.lingering.Store(true)
	c.t.mu.Lock()
	tlsConn := c.tls
	c.t.mu.Unlock()
	if tlsConn != nil {
		tlsConn.CloseWrite()
	}
	c.CloseWrite()
	c.Conn.SetReadDeadline(time.Now().Add(lingerTimeout))
	// Closes it if no reader is left to see the read-drain end.
	time.AfterFunc(2*lingerTimeout, func() { c.closeNow() })
	return true
}

// OnDrain registers f to run in its own goroutine when the process starts to
// drain, in the spirit of [http.Server.RegisterOnShutdown]: a hook to tell
// long-lived work (a job queue consumer, a raw protocol) to wind down.
// Registered once the drain has started, f runs at once. The drain waits for
// every f until its deadline.
func (p *Process) OnDrain(f func()) {
	p.hooksMu.Lock()
	defer p.hooksMu.Unlock()
	if p.hooksStarted {
		p.runHookLocked(f)
		return
	}
	p.onDrain = append(p.onDrain, f)
}

func (p *Process) runHookLocked(f func()) {
	p.hooks.Add(1)
	go func() {
		defer p.hooks.Done()
		f()
	}()
}

// Goodbye returns a channel closed when the long-lived stream (SSE,
// WebSocket, gRPC stream, raw connection) served under ctx should end with
// a goodbye in its own protocol. With [Options.GoodbyeSpread] zero it is
// [Process.Draining]. Otherwise the streams open when the drain starts are
// told one at a time, evenly over GoodbyeSpread and in random order, so that
// their clients do not all reconnect to the new process in the same instant;
// a stream that asks once the drain has started is told at once. The
// registration ends with ctx. A nil *Process returns a nil channel.
func (p *Process) Goodbye(ctx context.Context) <-chan struct{} {
	if p == nil {
		return nil
	}
	if p.opts.GoodbyeSpread <= 0 {
		return p.drainingC
	}
	p.hooksMu.Lock()
	defer p.hooksMu.Unlock()
	if p.hooksStarted {
		return p.drainingC
	}
	g := make(chan struct{})
	p.goodbyes[g] = struct{}{}
	context.AfterFunc(ctx, func() {
		p.hooksMu.Lock()
		delete(p.goodbyes, g)
		p.hooksMu.Unlock()
	})
	return g
}

// startHooks runs the OnDrain hooks and spreads the goodbyes. Called once,
// when the drain starts.
func (p *Process) startHooks() {
	p.hooksMu.Lock()
	defer p.hooksMu.Unlock()
	p.hooksStarted = true
	for _, f := range p.onDrain {
		p.runHookLocked(f)
	}
	p.onDrain = nil
	if len(p.goodbyes) == 0 {
		return
	}
	list := make([]chan struct{}, 0, len(p.goodbyes))
	for g := range p.goodbyes {
		list = append(list, g)
	}
	p.goodbyes = nil
	rand.Shuffle(len(list), func(i, j int) { list[i], list[j] = list[j], list[i] })
	spread := p.opts.GoodbyeSpread
	p.runHookLocked(func() {
		start := time.Now()
		t := time.NewTimer(0)
		defer t.Stop()
		for i, g := range list {
			if d := time.Until(start.Add(spread * time.Duration(i) / time.Duration(len(list)))); d > 0 {
				t.Reset(d)
				<-t.C
			}
			close(g)
		}
	})
}

// waitHooks waits for the OnDrain hooks and the goodbye spreading until ctx
// ends.
func (p *Process) waitHooks(ctx context.Context) {
	done := make(chan struct{})
	go func() {
		p.hooks.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		p.log.Warn("drain deadline: OnDrain hooks still running")
	}
}

// ServeConns registers a raw stream server (TCP or Unix): when
// [Process.Run] starts, each connection accepted on ln is tracked and
// handled by handle in its own goroutine; the connection is closed when
// handle returns. When the process drains, ln stops accepting and goodbye,
// if not nil, is called once for every open connection, in its own
// goroutine and spread over [Options.GoodbyeSpread], to say goodbye in the
// connection's protocol (for example: set a read deadline so that handle
// finishes the message it is reading, sends "BYE" and returns). Handlers
// have until [Options.DrainTimeout] to return; then their connections are
// closed.
func (p *Process) ServeConns(ln net.Listener, handle func(net.Conn), goodbye func(net.Conn)) {
	if handle == nil {
		panic("graceful: ServeConns with nil handle")
	}
	t := newTracker()
	t.key = ln.Addr().String()
	s := &connServer{p: p, ln: &trackedListener{Listener: ln, t: t}, t: t, handle: handle, goodbye: goodbye, stopping: make(chan struct{})}
	p.addListener(s.ln)
	if p.hasParent() {
		// Connections the parent hands over with [Process.HandOff].
		inj := newInjectListener(ln.Addr())
		p.injectMu.Lock()
		p.injectors[t.key] = inj
		p.injectMu.Unlock()
		s.inject = &trackedListener{Listener: inj, t: t}
		s.injected = make(chan struct{})
	}
	p.Add(s.run, s.stop)
}

// HandOff passes c, a connection accepted by a [Process.ServeConns]
// listener, to the new process after a successful upgrade, typically from
// the goodbye callback's effect at a message boundary: nothing of the next
// message may have been read from c yet (bytes the peer sent stay in the
// socket and reach the new process). On success the new process's handle
// gets c as a new connection, and the caller must return from handle
// without using c again. It fails, and c stays the caller's, when there is
// no successor to take it (no upgrade, [Options.NoHandOff], a platform
// without descriptor passing) or sending fails.
func (p *Process) HandOff(c net.Conn) error {
	tc, ok := c.(*trackedConn)
	if !ok || tc.t.key == "" {
		return errors.New("graceful: HandOff: not a connection from ServeConns")
	}
	if !p.canHandOff() {
		return errors.New("graceful: HandOff: no new process to hand the connection to")
	}
	if err := p.handOffConn(tc.t.key, tc.Conn); err != nil {
		return fmt.Errorf("graceful: HandOff: %w", err)
	}
	tc.t.handed.Add(1)
	return nil
}

type connServer struct {
	p       *Process
	ln      *trackedListener
	t       *tracker
	handle  func(net.Conn)
	goodbye func(net.Conn)

	handlers sync.WaitGroup   // handlers and goodbyes
	stopping chan struct{}    // closed by stop
	inject   *trackedListener // connections handed over by the parent
	injected chan struct{}    // closed when inject is done accepting
}

func (s *connServer) run() error {
	if s.inject != nil {
		go func() {
			defer close(s.injected)
			s.accept(s.inject) // ends once the parent is gone
		}()
		defer func() { <-s.injected }()
	}
	return s.accept(s.ln)
}

func (s *connServer) accept(ln *trackedListener) error {
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if ln.closed.Load() || errors.Is(err, net.ErrClosed) && ln == s.inject {
				return nil
			}
			var ne net.Error
			if !errors.As(err, &ne) || !ne.Timeout() && !errors.Is(err, syscall.EMFILE) && !errors.Is(err, syscall.ENFILE) && !errors.Is(err, syscall.ECONNABORTED) {
				return err
			}
			// Out of descriptors and the like: back off, as net/http does,
			// rather than end the server.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			s.p.log.Warn("accept failed; retrying", "addr", ln.Addr().String(), "err", err, "retry_in", delay)
			t := time.NewTimer(delay)
			select {
			case <-t.C:
			case <-s.stopping:
				t.Stop()
			}
			continue
		}
		delay = 0
		s.handlers.Add(1)
		go func() {
			defer s.handlers.Done()
			defer c.Close()
			s.handle(c)
		}()
		select {
		case <-s.stopping:
			// Handed over by the parent during our own drain: its goodbye
			// is now.
			s.sayGoodbye(c.(*trackedConn))
		default:
		}
	}
}

// sayGoodbye calls goodbye for c, once, in its own goroutine.
func (s *connServer) sayGoodbye(c *trackedConn) {
	if s.goodbye == nil || !c.goodbye.CompareAndSwap(false, true) {
		return
	}
	s.handlers.Add(1)
	go func() {
		defer s.handlers.Done()
		s.goodbye(c)
	}()
}

func (s *connServer) stop(ctx context.Context) error {
	close(s.stopping)
	s.ln.Close()
	defer func() {
		if n := s.t.handed.Load(); n > 0 {
			s.p.log.Info("connections handed to the new process", "addr", s.t.key, "conns", n)
		}
	}()
	if s.goodbye != nil {
		s.t.mu.Lock()
		conns := make([]*trackedConn, 0, len(s.t.conns))
		for c := range s.t.conns {
			conns = append(conns, c)
		}
		s.t.mu.Unlock()
		rand.Shuffle(len(conns), func(i, j int) { conns[i], conns[j] = conns[j], conns[i] })
		start, spread := time.Now(), s.p.opts.GoodbyeSpread
		for i, c := range conns {
			if d := time.Until(start.Add(spread * time.Duration(i) / time.Duration(len(conns)))); d > 0 {
				select {
				case <-time.After(d):
				case <-ctx.Done():
				}
			}
			s.sayGoodbye(c)
		}
	}
	if s.inject != nil {
		// Connections our parent still hands over get their goodbye as
		// they arrive; wait for the last one before counting.
		select {
		case <-s.injected:
		case <-ctx.Done():
		}
	}
	if err := s.t.waitUntil(ctx, func() bool { return s.t.count() == 0 }); err != nil {
		n := s.t.closeAll()
		s.p.log.Warn("drain deadline: connections force-closed", "conns", n)
	}
	s.handlers.Wait()
	return nil
}

// injectListener delivers the connections a parent hands over to the
// http.Server that serves its listener's address, through Accept. It keeps
// accepting through our own drain (net/http's Close of it is ignored) until
// the parent is gone and every connection it sent is delivered: one sent
// late is served, or passed on, like any other.
type injectListener struct {
	addr    net.Addr
	c       chan net.Conn
	once    sync.Once
	done    chan struct{} // the parent is gone: no more connections
	stopped chan struct{} // nobody accepts any more (closed by run)
}

func newInjectListener(addr net.Addr) *injectListener {
	return &injectListener{addr: addr, c: make(chan net.Conn, 64), done: make(chan struct{}), stopped: make(chan struct{})}
}

func (l *injectListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.c:
		return c, nil
	default:
	}
	select {
	case c := <-l.c:
		return c, nil
	case <-l.done:
		select {
		case c := <-l.c:
			return c, nil
		default:
			return nil, net.ErrClosed
		}
	}
}

// Close is a no-op: http.Server.Shutdown must not drop connections still
// on their way from the parent. finish ends the listener.
func (l *injectListener) Close() error { return nil }

func (l *injectListener) finish() { l.once.Do(func() { close(l.done) }) }

func (l *injectListener) Addr() net.Addr { return l.addr }

// inject serves c, handed over by the parent, on the server of listener.
func (p *Process) inject(listener string, c net.Conn) {
	p.injectMu.Lock()
	inj := p.injectors[listener]
	p.injectMu.Unlock()
	if inj == nil {
		p.log.Warn("connection hand-off: no server for listener; closing", "listener", listener)
		c.Close()
		return
	}
	select {
	case inj.c <- c:
	case <-inj.stopped:
		c.Close() // the server is gone (it failed): nobody can serve it
	}
}

// closeInjectors ends the hand-off: the parent is gone.
func (p *Process) closeInjectors() {
	p.injectMu.Lock()
	defer p.injectMu.Unlock()
	for _, inj := range p.injectors {
		inj.finish()
	}
}
