// Command gonethttp is the benchmark's Go reference: the bench wire contract
// (bench/common.py) served by Go's standard net/http, written the way a Go
// shop would write it.
//
//   - GET /sse: an event stream; http.Flusher after each write.
//   - GET /ws: a gorilla/websocket listener receiving every broadcast.
//   - GET /echo: a gorilla/websocket echo (ReadMessage / WriteMessage).
//   - GET /view: a small JSON document (the "ordinary view").
//   - GET /publish?kind=sse|ws&n=K&size=B&interval=S&run=R: answers at once,
//     then publishes K events from a goroutine.
//
// Every event is encoded once per publish into a []byte shared by all
// subscribers. Each subscriber has one writer goroutine that drains its whole
// queue and hands it to the socket in one Write (+ Flush for SSE): whatever
// was queued while it wrote leaves in one write (how much that is depends on
// the scheduler: docs/performance.md measures it). For /ws the coalesced frames
// go straight to the hijacked connection (gorilla has no "write several
// messages at once" call; its control replies are single Writes, which Go's
// net.Conn never interleaves); BENCH_GO_WS=prepared writes one
// gorilla.PreparedMessage per event instead. Heartbeats (": hb" comments and
// empty pings) are queued to every subscriber by one ticker, like raw epoll's
// single pass per interval.
//
// The runner starts it through bench/servers/gonethttp_server.py, which
// builds this file once and execs the binary with the same flags; the first
// stdout line is the readiness JSON the runner waits for.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/gorilla/websocket"
)

// maxQueued is how far (bytes) a subscriber may fall behind before it is cut
// off, the same bound as the raw epoll server's.
const maxQueued = 8 << 20

var (
	sseOpen    = []byte(": open\n\n")
	sseHB      = []byte(": hb\n\n")
	wsPing     = []byte{0x89, 0x00}
	preparedWS = os.Getenv("BENCH_GO_WS") == "prepared"
	// Go needs no yield between back-to-back events (the writers run on the
	// other Ps, and the scheduler preempts); BENCH_GO_PUBLISH_YIELD=1 calls
	// runtime.Gosched() after each one, a literal reading of the contract's
	// "yield between events".
	publishYield = os.Getenv("BENCH_GO_PUBLISH_YIELD") == "1"
)

// frame is one encoded event, shared by every subscriber it is queued to.
type frame struct {
	b    []byte                     // wire bytes (SSE event or unmasked WS frame)
	pm   *websocket.PreparedMessage // prepared-mode WS message (nil otherwise)
	ping bool                       // a WS heartbeat ping
}

// client is one subscriber's queue; its writer goroutine drains it.
type client struct {
	mu     sync.Mutex
	queue  []*frame
	spare  []*frame
	queued int
	over   bool
	wake   chan struct{} // capacity 1: "the queue is not empty"
}

func newClient() *client { return &client{wake: make(chan struct{}, 1)} }

func (c *client) push(f *frame) {
	c.mu.Lock()
	if c.over {
		c.mu.Unlock()
		return
	}
	c.queue = append(c.queue, f)
	c.queued += len(f.b)
	if c.queued > maxQueued {
		c.over = true
	}
	c.mu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// take returns everything queued (and whether the client fell too far
// behind); the caller hands the slice back with give.
func (c *client) take() ([]*frame, bool) {
	c.mu.Lock()
	q := c.queue
	c.queue, c.spare = c.spare, nil
	c.queued = 0
	over := c.over
	c.mu.Unlock()
	return q, over
}

func (c *client) give(q []*frame) {
	for i := range q {
		q[i] = nil
	}
	c.mu.Lock()
	if c.spare == nil {
		c.spare = q[:0]
	}
	c.mu.Unlock()
}

// hub is the set of subscribers of one kind.
type hub struct {
	mu      sync.RWMutex
	clients map[*client]struct{}
}

func newHub() *hub { return &hub{clients: make(map[*client]struct{})} }

func (h *hub) add(c *client) {
	h.mu.Lock()
	h.clients[c] = struct{}{}
	h.mu.Unlock()
}

func (h *hub) remove(c *client) {
	h.mu.Lock()
	delete(h.clients, c)
	h.mu.Unlock()
}

func (h *hub) broadcast(f *frame) {
	h.mu.RLock()
	for c := range h.clients {
		c.push(f)
	}
	h.mu.RUnlock()
}

var (
	sseHub = newHub()
	wsHub  = newHub()
	// Write buffers come from a pool: an idle listener holds none.
	upgrader = websocket.Upgrader{ReadBufferSize: 4096, WriteBufferSize: 4096,
		WriteBufferPool: &sync.Pool{}}
	bufPool = sync.Pool{New: func() any { b := make([]byte, 0, 16<<10); return &b }}
)

// join concatenates frames into a pooled buffer (one write for the lot).
func join(q []*frame) (*[]byte, []byte) {
	if len(q) == 1 {
		return nil, q[0].b
	}
	bp := bufPool.Get().(*[]byte)
	buf := (*bp)[:0]
	for _, f := range q {
		buf = append(buf, f.b...)
	}
	*bp = buf
	return bp, buf
}

func release(bp *[]byte) {
	if bp != nil && cap(*bp) <= 1<<20 {
		bufPool.Put(bp)
	}
}

func handleSSE(w http.ResponseWriter, r *http.Request) {
	fl, ok := w.(http.Flusher)
	if !ok {
		http.Error(w, "streaming unsupported", http.StatusInternalServerError)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	if _, err := w.Write(sseOpen); err != nil {
		return
	}
	fl.Flush()
	c := newClient()
	sseHub.add(c)
	defer sseHub.remove(c)
	done := r.Context().Done() // closed when the client goes away
	for {
		select {
		case <-done:
			return
		case <-c.wake:
		}
		q, over := c.take()
		if len(q) > 0 {
			bp, data := join(q)
			_, err := w.Write(data)
			if err == nil {
				fl.Flush()
			}
			release(bp)
			c.give(q)
			if err != nil {
				return
			}
		}
		if over {
			log.Printf("sse: subscriber %s over %d bytes behind, closed", r.RemoteAddr, maxQueued)
			return
		}
	}
}

func handleWS(w http.ResponseWriter, r *http.Request) {
	conn, err := upgrader.Upgrade(w, r, nil)
	if err != nil {
		return // Upgrade already answered with an HTTP error
	}
	c := newClient()
	quit := make(chan struct{})
	wsHub.add(c)
	go wsWriter(conn, c, quit)
	// The reader discards data; gorilla answers pings and close frames.
	for {
		if _, _, err := conn.NextReader(); err != nil {
			break
		}
	}
	wsHub.remove(c)
	close(quit)
	conn.Close()
}

func wsWriter(conn *websocket.Conn, c *client, quit chan struct{}) {
	raw := conn.UnderlyingConn()
	for {
		select {
		case <-quit:
			return
		case <-c.wake:
		}
		q, over := c.take()
		var err error
		if preparedWS {
			for _, f := range q {
				if f.ping {
					err = conn.WriteControl(websocket.PingMessage, nil, time.Now().Add(10*time.Second))
				} else {
					err = conn.WritePreparedMessage(f.pm)
				}
				if err != nil {
					break
				}
			}
		} else if len(q) > 0 {
			bp, data := join(q)
			_, err = raw.Write(data)
			release(bp)
		}
		c.give(q)
		if over {
			log.Printf("ws: subscriber %s over %d bytes behind, closed", conn.RemoteAddr(), maxQueued)
		}
		if err != nil || over {
			conn.Close() // ends the reader loop, which unregisters the client
			return
		}
	}
}

func handleEcho(w http.ResponseWriter, r *http.Request) {
	conn, err := upgrader.Upgrade(w, r, nil)
	if err != nil {
		return
	}
	defer conn.Close()
	for {
		mt, msg, err := conn.ReadMessage()
		if err != nil {
			return
		}
		if err := conn.WriteMessage(mt, msg); err != nil {
			return
		}
	}
}

type item struct {
	ID    int     `json:"id"`
	Name  string  `json:"name"`
	Price float64 `json:"price"`
}

var viewItems = func() []item {
	items := make([]item, 20)
	for i := range items {
		items[i] = item{ID: i, Name: fmt.Sprintf("item-%d", i), Price: float64(i) * 1.25}
	}
	return items
}()

// handleView does the "ordinary view" work of bench/common.py's view_body.
func handleView(w http.ResponseWriter, r *http.Request) {
	total := 0.0
	for _, it := range viewItems {
		total += it.Price
	}
	body, _ := json.Marshal(struct {
		Items []item  `json:"items"`
		Total float64 `json:"total"`
	}{viewItems, total})
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.Write(body)
}

// nowNs is CLOCK_MONOTONIC in ns, the clock the load generator compares
// publish timestamps with (Go's time package does not expose its raw value).
func nowNs() int64 {
	var ts syscall.Timespec
	syscall.Syscall(syscall.SYS_CLOCK_GETTIME, 1 /* CLOCK_MONOTONIC */, uintptr(unsafe.Pointer(&ts)), 0)
	return ts.Nano()
}

// makePayload mirrors common.make_payload: "<run> <seq> <t_ns> " padded with x.
func makePayload(run, seq int64, size int) []byte {
	b := make([]byte, 0, size+16)
	b = strconv.AppendInt(b, run, 10)
	b = append(b, ' ')
	b = strconv.AppendInt(b, seq, 10)
	b = append(b, ' ')
	b = strconv.AppendInt(b, nowNs(), 10)
	b = append(b, ' ')
	for len(b) < size {
		b = append(b, 'x')
	}
	return b
}

func wsFrame(payload []byte) []byte {
	n := len(payload)
	var head []byte
	switch {
	case n < 126:
		head = []byte{0x81, byte(n)}
	case n < 65536:
		head = []byte{0x81, 126, byte(n >> 8), byte(n)}
	default:
		head = []byte{0x81, 127, 0, 0, 0, 0, byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)}
	}
	return append(head, payload...)
}

type publishJob struct {
	kind     string
	n, size  int
	run      int64
	interval time.Duration
}

// parsePublish mirrors common.parse_publish_query (bounded, defaulted values).
func parsePublish(r *http.Request) publishJob {
	q := r.URL.Query()
	num := func(name string, def, lo, hi float64) float64 {
		v, err := strconv.ParseFloat(q.Get(name), 64)
		if err != nil {
			v = def
		}
		if v < lo {
			v = lo
		}
		if v > hi {
			v = hi
		}
		return v
	}
	kind := q.Get("kind")
	if kind == "" {
		kind = "sse"
	}
	return publishJob{
		kind:     kind,
		n:        int(num("n", 1, 0, 10_000_000)),
		size:     int(num("size", 100, 16, 65536)),
		run:      int64(num("run", 0, 0, 1<<40)),
		interval: time.Duration(num("interval", 0, 0, 60) * float64(time.Second)),
	}
}

func publish(p publishJob) {
	for seq := 0; seq < p.n; seq++ {
		payload := makePayload(p.run, int64(seq), p.size)
		if p.kind == "ws" {
			f := &frame{b: wsFrame(payload)}
			if preparedWS {
				pm, err := websocket.NewPreparedMessage(websocket.TextMessage, payload)
				if err != nil {
					log.Printf("publish: %v", err)
					return
				}
				f.pm = pm
			}
			wsHub.broadcast(f)
		} else {
			b := make([]byte, 0, len(payload)+8)
			b = append(append(append(b, "data: "...), payload...), "\n\n"...)
			sseHub.broadcast(&frame{b: b})
		}
		if p.interval > 0 {
			time.Sleep(p.interval)
		} else if publishYield {
			runtime.Gosched()
		}
	}
}

func handlePublish(w http.ResponseWriter, r *http.Request) {
	go publish(parsePublish(r))
	w.Header().Set("Content-Type", "text/plain")
	w.Write([]byte("ok\n"))
}

func heartbeats(every time.Duration) {
	hb := &frame{b: sseHB}
	ping := &frame{b: wsPing, ping: true}
	for range time.Tick(every) {
		sseHub.broadcast(hb)
		wsHub.broadcast(ping)
	}
}

func main() {
	host := flag.String("host", "127.0.0.1", "listen address")
	port := flag.Int("port", 0, "listen port (0 = any)")
	heartbeat := flag.Float64("heartbeat", 2.0, "seconds between heartbeats; 0 disables")
	flag.Parse()
	log.SetFlags(0)

	mux := http.NewServeMux()
	mux.HandleFunc("/sse", handleSSE)
	mux.HandleFunc("/ws", handleWS)
	mux.HandleFunc("/echo", handleEcho)
	mux.HandleFunc("/view", handleView)
	mux.HandleFunc("/publish", handlePublish)

	ln, err := net.Listen("tcp", net.JoinHostPort(*host, strconv.Itoa(*port)))
	if err != nil {
		log.Fatalf("listen: %v", err)
	}
	if *heartbeat > 0 {
		go heartbeats(time.Duration(*heartbeat * float64(time.Second)))
	}
	mode := "coalesced"
	if preparedWS {
		mode = "prepared"
	}
	ready, _ := json.Marshal(map[string]any{
		"ready": true, "port": ln.Addr().(*net.TCPAddr).Port, "pid": os.Getpid(),
		"kinds": []string{"sse", "ws"}, "echo": true, "legacy": "sse",
		"server":   "go net/http " + runtime.Version() + ", gorilla/websocket",
		"ws_write": mode, "publish_yield": publishYield, "gomaxprocs": runtime.GOMAXPROCS(0),
	})
	os.Stdout.Write(append(ready, '\n'))
	srv := &http.Server{Handler: mux, ErrorLog: log.New(os.Stderr, "", 0)}
	log.Fatal(srv.Serve(ln))
}
