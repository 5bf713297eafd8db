#include "flasher/station/page.hpp"

#include "common/error.hpp"
#include "common/glib.hpp"
#include "common/templates.hpp"
#include "common/text.hpp"

#include <chrono>
#include <deque>
#include <future>
#include <libsoup/soup.h>
#include <mutex>
#include <nlohmann/json.hpp>
#include <map>
#include <thread>

namespace treeflash::flasher {

namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr guint push_every_ms = 250;

} // namespace

struct StationPage::Impl {
    explicit Impl(const LineState& served)
        : line(served)
    {
    }

    const LineState& line; // updated by the station's slot threads
    uint64_t pushed = 0;   // the version of it last sent to the open pages

    // Owned by the server thread (the context and loop by both).
    glib::MainContext context;
    glib::MainLoop loop;
    glib::Object<SoupServer> server;
    // The open /events streams, each held until it is finished.
    std::map<SoupServerMessage*, glib::Object<SoupServerMessage>> clients;
    std::thread thread;
    std::string url;

    json snapshot() const
    {
        LineSnapshot now = line.snapshot();
        json errors = json::array();
        for (const auto& e : now.errors)
            errors.push_back({{"time", e.time}, {"slot", e.slot}, {"error", e.error}});
        json out{{"image", now.info.image}, {"image_sha256", now.info.image_sha256}, {"commit", now.info.commit},
                 {"ok", now.ok}, {"failed", now.failed}, {"per_hour", now.per_hour},
                 {"units_left", now.info.units ? json(now.info.units_left) : json(nullptr)},
                 {"units_total", now.info.units_total}, {"errors", errors}};
        json list = json::array();
        for (const auto& s : now.slots)
            list.push_back({{"slot", s.slot + 1}, {"device", text::printable(s.device)},
                            {"state", slot_state_name(s.state)}, {"done", s.done}, {"total", s.total},
                            {"rate", slot_rate(s)}, {"eta", slot_seconds_left(s)},
                            {"card", text::printable(s.card)}, {"unit", s.unit},
                            {"message", text::printable(s.message)}});
        out["slots"] = list;
        return out;
    }

    // On the server thread: the snapshot to every open page.
    void push()
    {
        if (clients.empty() || line.version() == pushed)
            return;
        pushed = line.version();
        std::string event = "data: " + snapshot().dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n";
        for (const auto& [msg, held] : clients) {
            soup_message_body_append(soup_server_message_get_response_body(msg), SOUP_MEMORY_COPY, event.data(),
                                     event.size());
            soup_server_message_unpause(msg);
        }
    }

    static void on_finished(SoupServerMessage* msg, gpointer data)
    {
        static_cast<Impl*>(data)->clients.erase(msg);
    }

    static void handle(SoupServer*, SoupServerMessage* msg, const char* path, GHashTable*, gpointer data)
    {
        auto* self = static_cast<Impl*>(data);
        if (g_strcmp0(soup_server_message_get_method(msg), "GET") != 0) {
            soup_server_message_set_status(msg, SOUP_STATUS_METHOD_NOT_ALLOWED, nullptr);
            return;
        }
        SoupMessageHeaders* headers = soup_server_message_get_response_headers(msg);
        soup_message_headers_replace(headers, "Cache-Control", "no-store");
        std::string where = path ? path : "";
        if (where == "/") {
            // The page with the state as of now in it; "<" escaped, so no
            // text from a card can close the script.
            std::string state = self->snapshot().dump(-1, ' ', false, json::error_handler_t::replace);
            text::replace_all(state, "<", "\\u003c");
            std::string page(templates::get("station.html"));
            text::replace_all(page, "/*STATE*/null", state);
            soup_server_message_set_status(msg, SOUP_STATUS_OK, nullptr);
            soup_server_message_set_response(msg, "text/html; charset=utf-8", SOUP_MEMORY_COPY, page.data(),
                                             page.size());
        } else if (where == "/state") {
            std::string body = self->snapshot().dump(-1, ' ', false, json::error_handler_t::replace);
            soup_server_message_set_status(msg, SOUP_STATUS_OK, nullptr);
            soup_server_message_set_response(msg, "application/json", SOUP_MEMORY_COPY, body.data(), body.size());
        } else if (where == "/events") {
            soup_server_message_set_status(msg, SOUP_STATUS_OK, nullptr);
            soup_message_headers_set_encoding(headers, SOUP_ENCODING_CHUNKED);
            soup_message_headers_set_content_type(headers, "text/event-stream", nullptr);
            std::string first = "retry: 1000\ndata: " + self->snapshot().dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n";
            soup_message_body_append(soup_server_message_get_response_body(msg), SOUP_MEMORY_COPY, first.data(),
                                     first.size());
            self->clients.emplace(msg, glib::Object<SoupServerMessage>(
                                           static_cast<SoupServerMessage*>(g_object_ref(msg))));
            g_signal_connect(msg, "finished", G_CALLBACK(on_finished), self);
        } else {
            soup_server_message_set_status(msg, SOUP_STATUS_NOT_FOUND, nullptr);
        }
    }

    static gboolean on_tick(gpointer data)
    {
        static_cast<Impl*>(data)->push();
        return G_SOURCE_CONTINUE;
    }

    // The server thread: listens (reporting how through `started`), then
    // serves until the loop is quit.
    void serve(const std::string& host, guint16 port, std::promise<std::string>& started)
    {
        g_main_context_push_thread_default(context.get());
        serve_on_context(host, port, started);
        g_main_context_pop_thread_default(context.get());
    }

    void serve_on_context(const std::string& host, guint16 port, std::promise<std::string>& started)
    {
        server.reset(soup_server_new("server-header", "treeflash-station", nullptr));
        soup_server_add_handler(server.get(), nullptr, handle, this, nullptr);
        GError* raw = nullptr;
        glib::Object<GInetAddress> inet(g_inet_address_new_from_string(host.c_str()));
        bool listening = false;
        if (inet) {
            glib::Object<GSocketAddress> address(g_inet_socket_address_new(inet.get(), port));
            listening = soup_server_listen(server.get(), address.get(), static_cast<SoupServerListenOptions>(0), &raw);
        }
        glib::ErrorPtr error(raw);
        if (!listening) {
            std::string why = error ? error->message : "not an IP address: " + host;
            started.set_exception(
                std::make_exception_ptr(Error("--http " + host + ":" + std::to_string(port) + ": " + why)));
            server.reset();
            return;
        }
        glib::UriList uris(soup_server_get_uris(server.get()));
        std::string bound = uris ? glib::take_string(g_uri_to_string(static_cast<GUri*>(uris->data))) : "";
        started.set_value(bound);
        {
            glib::Source tick(g_timeout_source_new(push_every_ms));
            g_source_set_callback(tick.get(), on_tick, this, nullptr);
            g_source_attach(tick.get(), context.get());
            g_main_loop_run(loop.get());
        }
        // Open pages see the end of their stream and retry.
        for (const auto& [msg, held] : clients) {
            soup_message_body_complete(soup_server_message_get_response_body(msg));
            soup_server_message_unpause(msg);
        }
        soup_server_disconnect(server.get());
        for (const auto& [msg, held] : clients)
            g_signal_handlers_disconnect_by_data(msg, this);
        clients.clear();
        server.reset();
    }
};

StationPage::StationPage(const std::string& address, const LineState& line)
    : m(std::make_unique<Impl>(line))
{
    auto colon = address.rfind(':');
    if (colon == std::string::npos || colon == 0)
        throw Error("--http " + address + ": give HOST:PORT, such as 0.0.0.0:8080");
    std::string host = address.substr(0, colon);
    if (host.size() > 2 && host.front() == '[' && host.back() == ']')
        host = host.substr(1, host.size() - 2);
    std::string port_text = address.substr(colon + 1);
    if (port_text.empty() || port_text.size() > 5 || port_text.find_first_not_of("0123456789") != std::string::npos
        || std::stoul(port_text) > 65535)
        throw Error("--http " + address + ": the port must be a number from 0 to 65535");
    m->context.reset(g_main_context_new());
    m->loop.reset(g_main_loop_new(m->context.get(), FALSE));
    std::promise<std::string> started;
    auto bound = started.get_future();
    guint16 port = static_cast<guint16>(std::stoul(port_text));
    m->thread = std::thread([this, host, port, &started] { m->serve(host, port, started); });
    try {
        m->url = bound.get();
    } catch (...) {
        m->thread.join();
        throw;
    }
}

StationPage::~StationPage()
{
    g_main_context_invoke(
        m->context.get(),
        [](gpointer loop) -> gboolean {
            g_main_loop_quit(static_cast<GMainLoop*>(loop));
            return G_SOURCE_REMOVE;
        },
        m->loop.get());
    m->thread.join();
}

std::string StationPage::url() const { return m->url; }

} // namespace treeflash::flasher
